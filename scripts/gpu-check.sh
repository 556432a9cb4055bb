#!/usr/bin/env bash
# moec's CUDA kernels on a real NVIDIA GPU (issue 16): run ON the GPU machine, after
#   .venv/bin/python scripts/gpu_check.py prepare --base 6bcd8f0 --schedules 32,4,4 16,8,4 32,8,8
# here: builds .gpu-check/ (git-ignored; 16.8 MiB). --base: the benchmark blocks also as moec built
# them before the GPU kernel redesign (the group sort on one thread, each thread looping over the
# experts); --schedules: also with other kernel schedules than the bundled 32,8,4; all timed beside.
# The device tool sends the checkout and the carried .gpu-check/ (64 MiB at most together; the
# tracked fixtures/models, 88 MB, must be moved out of the tree for that call), e.g.
#   mv fixtures/models /tmp/moec-fixtures      # then device run: command "bash scripts/gpu-check.sh",
#                                              # carry [".gpu-check"], timeout_s 300
#   mv /tmp/moec-fixtures fixtures/models
# It needs only python3 and numpy there (the machine is offline: nothing is installed). Every case
# is compared with the numpy reference; the benchmark block is timed at 1 and 16 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.gpu-check}"
python3 scripts/gpu_check.py run --dir .gpu-check 2>&1 | tee "$out/gpu-check.log"
