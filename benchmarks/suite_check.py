"""What ``gpu_suite.sh --dry-run`` runs for each stage on a machine without a GPU: the stage's imports, its files
and its flags, without the work.

    python benchmarks/suite_check.py imports vllm datasets torchao      # each must import
    python benchmarks/suite_check.py script benchmarks/bench_update.py --model qwen2_5_vl_7b ...  # flags parse
    python benchmarks/suite_check.py files configs/x.yaml tests/test_vllm_engine.py                # each exists

``script`` runs the script's own module code up to its ``parse_args`` (its imports included) and stops there:
a flag it does not know fails as it would on the GPU machine, with its usage line.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path


class _Parsed(Exception):
    pass


def check_script(script: str, args: list[str]) -> None:
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, a=None, namespace=None):
        parse(self, a, namespace)  # an unknown or malformed flag exits here with code 2
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except _Parsed:
        print(f"ok: {script} takes {' '.join(args) or 'no flags'}")
        return
    finally:
        argparse.ArgumentParser.parse_args = parse
    raise SystemExit(f"{script}: never parsed its flags")


def main() -> None:
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "imports":
        for name in rest:
            importlib.import_module(name)
        print(f"ok: imports {' '.join(rest)}")
    elif what == "files":
        missing = [f for f in rest if not Path(f).exists()]
        if missing:
            raise SystemExit(f"missing: {' '.join(missing)}")
        print(f"ok: {len(rest)} file(s)")
    elif what == "script":
        check_script(rest[0], rest[1:])
    else:
        raise SystemExit(f"unknown check {what!r}: imports, files or script")


if __name__ == "__main__":
    main()
