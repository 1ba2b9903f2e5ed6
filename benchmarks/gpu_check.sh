#!/usr/bin/env bash
# GPU check of se_retrofit (about 3-5 minutes on one GPU). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # OUT_DIR default: ./gpu_check_out
#
# 1. CUDA identity: resnet50 + SE (standard, post), ECA, CBAM: the edited model's output equals the
#    base model's (torch.equal, eval and train mode) in fp32, under float16 and bfloat16 autocast, and
#    with channels_last weights and inputs.
# 2. A 50-step AMP fine-tune through `se-retrofit finetune` (float16 autocast + GradScaler,
#    channels_last: the recipe defaults on CUDA), then --resume of a run stopped after epoch 1.
# 3. torchrun with nccl on every GPU present (`torchrun --nproc_per_node=N -m se_retrofit finetune`).
# 4. Inference (fp32 and float16 autocast) and training-step time of the edited resnet50 against timm's
#    seresnet50 (interleaved, CUDA-synchronised; ratios of minima and medians), and peak memory of a
#    step (torch.cuda.max_memory_allocated) via benchmarks/bench_train.py --device cuda.
#
# Every part prints PASS/FAIL lines; the script exits 1 if any part failed. Without CUDA it stops at
# once with one line saying so and exit code 2 (nothing here is meaningful on a CPU: use the test
# suite and benchmarks/bench_train.py there). Output: OUT_DIR/gpu_check.log and the runs' files.
set -uo pipefail

OUT="${1:-gpu_check_out}"
PY="${PYTHON:-python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
part() {  # part NAME SECONDS COMMAND...: run with a time limit, record PASS/FAIL
    local name="$1" limit="$2"; shift 2
    say "=== $name (limit ${limit}s)"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    if [ "$code" -eq 0 ]; then say "PASS $name ($((SECONDS - began)) s)";
    else say "FAIL $name (exit $code$([ "$code" -eq 124 ] && echo ', timed out'), $((SECONDS - began)) s)"; FAILED=1; fi
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False for $PY$("$PY" -c 'import torch; print(", torch " + torch.__version__ + ", CUDA build " + str(torch.version.cuda))' 2>/dev/null)); nothing was checked. Run it on a machine with a GPU." | tee -a "$LOG" >&2
    exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
say "gpu_check: $NGPU GPU(s): $("$PY" -c "import torch; print(', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"); torch $("$PY" -c 'import torch; print(torch.__version__)')"

# --- 1. identity on CUDA ----------------------------------------------------------------------------
part "identity fp32 / fp16 / bf16 autocast / channels_last" 120 "$PY" - <<'EOF'
import sys, torch, timm, se_retrofit

torch.backends.cudnn.benchmark = False
torch.backends.cudnn.deterministic = True
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")
torch.manual_seed(0)
base = timm.create_model("resnet50")
with torch.no_grad():  # trained-like BN statistics, so that eval mode is not near-trivial
    for m in base.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.1)
base = base.to(dev)
x = torch.randn(4, 3, 224, 224, device=dev)
failed = 0
for attention, position in [("se", "standard"), ("se", "post"), ("eca", "standard"), ("cbam", "standard")]:
    edited = se_retrofit.retrofit(base, attention=attention, position=position, example_input=x[:1])
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        b, e = base.to(memory_format=fmt), edited.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        for precision in ("fp32", "fp16", "bf16"):
            for mode in ("eval", "train"):
                b.train(mode == "train"); e.train(mode == "train")
                dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                    torch.manual_seed(1); yb = b(xi)
                    torch.manual_seed(1); ye = e(xi)
                same = torch.equal(yb, ye)
                diff = (yb.float() - ye.float()).abs().max().item()
                failed += not same
                print(f"{'ok  ' if same else 'DIFF'} {attention:4s} {position:8s} {layout:13s} {precision} {mode:5s} "
                      f"dtype {str(ye.dtype):14s} max|Δ| {diff:.3g}")
    base = base.to(memory_format=torch.contiguous_format)
print(f"{failed} combination(s) not bit-identical")
sys.exit(1 if failed else 0)
EOF

# --- 2. a 50-step AMP fine-tune through the product's command, with stop and resume ---------------------
DATA="$OUT/images"
"$PY" - "$DATA" <<'EOF'
import sys, numpy as np
from pathlib import Path
from PIL import Image
root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for c in range(3):  # 3 classes x 90 noise images of 72 px, each class with one colour channel raised
    (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(90):
        p = rng.integers(0, 200, (72, 72, 3), dtype=np.uint8); p[..., c] += 55
        Image.fromarray(p).save(root / f"class{c}" / f"{i}.png")
EOF
# 216 training images / batch 16 = 14 steps per epoch; 1 + 3 epochs = 56 steps (about 50)
FT=(-m se_retrofit finetune "$ROOT/recipes/resnet18-se-quick.yaml" --data "$DATA" --weights none --image-size 64
    --batch-size 16 --epochs 1,3 --workers 2 --device cuda --no-progress --out "$OUT/finetune-amp")
part "50-step AMP fine-tune (stopped after epoch 1)" 120 "$PY" "${FT[@]}" --overwrite --stop-after-epoch 1
part "50-step AMP fine-tune (--resume to the end)" 120 "$PY" "${FT[@]}" --resume
part "fine-tune outputs: AMP on, finite losses, model loads" 60 "$PY" - "$OUT/finetune-amp" <<'EOF'
import csv, math, sys, torch, yaml, se_retrofit
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/metrics.csv")))
recipe = yaml.safe_load(open(f"{out}/recipe.yaml"))
print(f"{len(rows)} epochs, val acc {[round(float(r['val_acc']), 3) for r in rows]}, amp {recipe['train']['amp']}, "
      f"channels_last {recipe['train']['channels_last']}")
assert len(rows) == 4 and all(math.isfinite(float(r["train_loss"])) for r in rows)
assert recipe["train"]["amp"] is True
model = se_retrofit.load(f"{out}/model")
print("loaded", type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
EOF

# --- 3. torchrun with nccl on the GPUs present ----------------------------------------------------------
part "torchrun nccl x$NGPU" 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
    -m se_retrofit finetune "$ROOT/recipes/resnet18-se-quick.yaml" --data "$DATA" --weights none --image-size 64 \
    --batch-size 16 --epochs 1,1 --workers 2 --no-progress --out "$OUT/finetune-ddp" --overwrite

# --- 4. inference and training-step ratios against seresnet50 -------------------------------------------
part "inference: edited resnet50 vs seresnet50" 90 "$PY" - <<'EOF'
import statistics, torch, timm, se_retrofit
torch.backends.cudnn.benchmark = True
dev = torch.device("cuda")
torch.manual_seed(0)
models = {"edited": se_retrofit.retrofit(timm.create_model("resnet50"), reduction=16).to(dev).eval(),
          "native": timm.create_model("seresnet50").to(dev).eval()}
for batch in (8, 64):
    x = torch.randn(batch, 3, 224, 224, device=dev)
    for precision in ("fp32", "fp16"):
        times = {k: [] for k in models}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
            for r in range(60):
                for k in (("edited", "native") if r % 2 else ("native", "edited")):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(); models[k](x); end.record(); torch.cuda.synchronize()
                    if r >= 10:
                        times[k].append(start.elapsed_time(end))
        mins = {k: min(v) for k, v in times.items()}; meds = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {batch:3d} {precision}: edited min {mins['edited']:.2f} ms median {meds['edited']:.2f}; native min "
              f"{mins['native']:.2f} median {meds['native']:.2f}; ratio minima {mins['edited'] / mins['native']:.3f}, "
              f"medians {meds['edited'] / meds['native']:.3f} (goal <= 1.03)")
EOF
part "training step and peak memory: edited resnet50 vs seresnet50" 120 \
    "$PY" "$ROOT/benchmarks/bench_train.py" --device cuda --skip-loop --repeats 30 --memory-repeats 3 \
    --json "$OUT/bench_train_cuda.json"

say "gpu_check: $([ $FAILED -eq 0 ] && echo 'all parts passed' || echo 'SOME PARTS FAILED') (log: $LOG, $SECONDS s)"
exit $FAILED
