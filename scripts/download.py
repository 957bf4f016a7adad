# Download a Hugging Face checkpoint (weights, config, tokenizer files only) into checkpoints/<repo_id>.
import argparse
import fnmatch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "*.tiktoken", "original/tokenizer.model",
              "chat_template.jinja"]
SAFETENSORS = ["model*.safetensors", "model.safetensors.index.json"]
PYTORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


class DownloadError(ValueError):
    pass


def hf_download(repo_id: str, hf_token: str = None, local_dir: Path = None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    local_dir = Path(local_dir or ROOT / repo_id)
    try:
        files = HfApi().list_repo_files(repo_id, token=hf_token)
        # safetensors when the repo has them, else the .bin files: never both
        weights = SAFETENSORS if any(fnmatch.fnmatch(f, SAFETENSORS[0]) for f in files) else PYTORCH_BIN
        snapshot_download(repo_id, local_dir=local_dir, token=hf_token, allow_patterns=weights + SIDE_FILES)
    except GatedRepoError:
        raise DownloadError(f"{repo_id} is gated: accept its license on huggingface.co, then pass --hf_token "
                            "(or set HF_TOKEN)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise DownloadError(f"{repo_id} not found on the Hugging Face hub (or it is private): check the id, "
                            "or pass --hf_token") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, OSError) as e:
        raise DownloadError(f"cannot reach the Hugging Face hub to download {repo_id} ({type(e).__name__}): check the "
                            "network and HF_HUB_OFFLINE, or convert a local folder or .gguf file instead") from None
    except Exception as e:  # connection errors come from whichever HTTP library huggingface_hub uses
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DownloadError(f"downloading {repo_id} failed ({reason})") from None
    return local_dir


def main():
    parser = argparse.ArgumentParser(description="Download a Hugging Face checkpoint into checkpoints/<repo_id>.")
    parser.add_argument("--repo_id", type=str, required=True, help="e.g. Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--hf_token", type=str, default=None, help="access token for gated or private repos")
    parser.add_argument("--local_dir", type=Path, default=None, help="where to put it (default: checkpoints/<repo_id>)")
    args = parser.parse_args()
    try:
        print(hf_download(args.repo_id, args.hf_token, args.local_dir))
    except DownloadError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
