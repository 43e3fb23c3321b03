"""Runs Python with TensorFlow, tensorflow_datasets and clu unimportable, as on the GPU machine.

  python tests/scripts/without_tensorflow.py --import MODULE [MODULE ...]
  python tests/scripts/without_tensorflow.py SCRIPT.py [ARGS ...]

The first form imports each module; the second runs a script as ``__main__``. Either way an
import of the blocked packages raises ImportError, and at the end the process fails (exit 3) if
any of them was loaded anyway.
"""

import importlib
import importlib.abc
import runpy
import sys

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: this process runs without TensorFlow")
        return None


def main(argv: list[str]) -> None:
    sys.meta_path.insert(0, _Blocker())
    if argv[0] == "--import":
        for module in argv[1:]:
            importlib.import_module(module)
        print(f"imported {len(argv) - 1} modules without TensorFlow")
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    if loaded:
        print(f"loaded anyway: {loaded[:5]}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1:])
