"""The bundled kernel schedule tables, shipped in moec's wheel as the package ``moec.bundled_schedules``.

This file makes the folder a package so that ``importlib.resources`` finds its TOML files in an
editable install as well as in an installed wheel (``pyproject.toml`` maps the folder).
"""
