#!/usr/bin/env bash
# The GPU check (issue 10): one prepared script for a GPU machine with no network. It ran in under 3 minutes on one H200,
# install included (BENCHMARKS.md, "GPU check"); every step has a time limit, so it ends within 8 minutes with one GPU.
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from anywhere
#   bash scripts/gpu_check.sh --smoke    # tiny sizes, on any machine, CPU included (PYTHON=.venv/bin/python here)
#
# 1. installs the wheels carried in .whl/ (git-ignored) into a private prefix, and the project with --no-deps;
# 2. writes synthetic photos to local disk and trains the ResNet50 recipe at 224 px for a bounded number of steps:
#    images/s with the real data pipeline and with tensors already on the GPU, peak GPU memory;
# 3. embeds at inference (images/s, bf16 and fp32) and searches 1,000,000 embeddings exactly: FAISS on the GPU
#    where a FAISS GPU build is installed, else torch.mm + topk, said so in the table;
# 4. runs tests/test_ddp.py on two GPUs with NCCL when two are visible, else says it skipped it;
# 5. prints one summary table (bench/gpu_check.py summary) and exits non-zero if any step failed.
# Each Python step runs in its own process under a time limit, so one failure or hang does not stop the others.
#
# The GPU machine has PyTorch, timm, Lightning, torchvision, OpenCV, ONNX Runtime, pandas, matplotlib, scikit-learn,
# PyYAML and pytest; the rest of what `reid fit` imports travels as wheels for its Python 3.12 (about 45 MiB; a run
# carries 64 MiB at most). Download them once, here, into .whl/:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2 \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     pytorch-metric-learning==2.9.0 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
#     faiss-cpu==1.15.1
#
# (If pip finds no wheel for one, add --platform manylinux_2_N_x86_64 for its N: 24, 31, 34, 35.) faiss-gpu and the
# CUDA 12 libraries it needs are hundreds of MiB, far over what can travel: the search step then measures
# torch.mm + topk on the GPU and labels it so; a FAISS GPU wheel dropped into .whl/ is used instead. FastAPI is not
# needed: the service is not part of this check. Then run it with the device tool: carry [".whl"], command
# "bash scripts/gpu_check.sh", timeout_s 540; put the table in BENCHMARKS.md with the device's name.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=$(command -v "${PYTHON:-python3}") || { echo "no python: ${PYTHON:-python3}" >&2; exit 2; }
[[ $PYTHON == /* ]] || PYTHON=$PWD/$PYTHON  # absolute (a venv's python must stay the link it is): steps cd elsewhere
SMOKE=()
if [[ "${1:-}" == "--smoke" || "${REID_GPU_CHECK_SMOKE:-}" == 1 ]]; then SMOKE=(--smoke); fi
WORK=${REID_GPU_CHECK_DIR:-/tmp/reid_gpu_check}  # scratch: emptied first (photos, the install prefix, results)
RESULTS=$WORK/results.jsonl
CHECK=("$PYTHON" "$REPO/bench/gpu_check.py")
rm -rf "$WORK" && mkdir -p "$WORK" || exit 2

record() {  # step status seconds note
    "${CHECK[@]}" record --results "$RESULTS" --name "$1" --status "$2" --seconds "$3" --note "$4"
}

# A Python step in its own process, at most $2 seconds. It records its own line, except when it is killed.
step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "${CHECK[@]}" "$name" --results "$RESULTS" "${SMOKE[@]}" "$@"
    rc=$?
    if (( rc == 124 || rc == 137 )); then
        record "$name" failed $((SECONDS - started)) "timed out after ${limit} s"
    elif (( rc > 1 )); then
        record "$name" failed $((SECONDS - started)) "exited with status $rc before recording a result"
    fi
}

# 1. Install: the carried wheels, then the project itself (its dependencies are the machine's and the wheels).
echo "== install"
started=$SECONDS
SITE=$WORK/site
notes=()
status=ok
shopt -s nullglob
wheels=("$REPO"/.whl/*.whl)
if (( ${#wheels[@]} )); then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}"; then
        notes+=("${#wheels[@]} wheels from .whl/")
    else
        status=failed
        notes+=("the wheels in .whl/ did not install")
    fi
else
    notes+=("no wheels in .whl/: the environment's own packages")
fi
# Built from a copy of what the package needs, so the working tree gets no build/ or egg-info from it.
mkdir -p "$WORK/src" && cp -r "$REPO"/{pyproject.toml,README.md,LICENSE,reid,service} "$WORK/src/"
if "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WORK/src"; then
    notes+=("project installed with --no-deps into $SITE")
else
    status=failed
    notes+=("the project did not install; the steps below import it from the source tree")
    SITE=$SITE:$REPO
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
# (from $WORK: in the repository, python -c would import the source tree in the current folder instead)
if ! imported=$(cd "$WORK" && "$PYTHON" -c "import albumentations, faiss, jsonargparse, lightning, timm
import pytorch_metric_learning, reid; print(reid.__file__)" 2>&1); then
    status=failed
fi
notes+=("reid from ${imported##*$'\n'}")
note=$(printf '%s; ' "${notes[@]}")
record install "$status" $((SECONDS - started)) "${note%; }"

# 2. Photos on local disk, then the training steps.
step photos 90 --root "$WORK/photos"
step train 180 --root "$WORK/photos"

# 3. Inference and search.
step embed 60
step search 90

# 4. DDP on two GPUs with NCCL: the test suite's own test, with the GPU accelerator.
started=$SECONDS
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if (( gpus >= 2 )); then
    echo "== ddp (NCCL, 2 of $gpus GPUs)"
    if REID_TEST_ACCELERATOR=gpu timeout --kill-after=10 180 "$PYTHON" -m pytest -q -p no:cacheprovider \
        --rootdir "$REPO" "$REPO/tests/test_ddp.py"; then
        record ddp ok $((SECONDS - started)) "tests/test_ddp.py on 2 GPUs, NCCL"
    else
        record ddp failed $((SECONDS - started)) "tests/test_ddp.py on 2 GPUs, NCCL: see its output above"
    fi
elif (( ${#SMOKE[@]} )); then
    echo "== ddp (smoke: gloo on the CPU)"
    if timeout --kill-after=10 180 "$PYTHON" -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
        "$REPO/tests/test_ddp.py"; then
        record ddp ok $((SECONDS - started)) "smoke: tests/test_ddp.py with 2 CPU processes on gloo ($gpus GPU visible)"
    else
        record ddp failed $((SECONDS - started)) "smoke: tests/test_ddp.py on gloo: see its output above"
    fi
else
    record ddp skipped 0 "$gpus GPU visible: DDP on NCCL needs 2 (the gloo version runs in the CPU test suite)"
fi

# 5. The table; its exit status is the script's.
"${CHECK[@]}" summary --results "$RESULTS" "${SMOKE[@]}"
