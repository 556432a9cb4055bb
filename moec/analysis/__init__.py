"""Analyses of a model that passes are driven by: the calibration profile of its routers."""
