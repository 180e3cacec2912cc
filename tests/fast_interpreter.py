"""Test-suite speed-up for Triton's interpreter (TRITON_INTERPRET=1): nested @triton.jit calls
reuse the language patch of the launch they run in.

The interpreter patches triton.language (five module scans) at every launch, and again at every
call of one @triton.jit function from another, though the launch's patch is still in place: for
kernels built from small helpers (the depthwise ones call them per column and per tap) that was
a quarter of the interpreter's time (cProfile of a depthwise parity test: 7 of 30 s). Here a
nested call whose language modules the running launch already patched skips the repeat; the
launch's own patch (and its restore at the end) is untouched, and so is any call that would patch
something else. Behaviour is unchanged: the same functions are patched in the same way. Uses
triton's private ``GridExecutor`` and ``_patch_lang``; if they are missing, nothing changes.
"""

from __future__ import annotations

import inspect


def reuse_language_patch() -> bool:
    """Install the speed-up; False (and nothing changed) when this triton lacks the hooks."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor, patch_lang = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "_patch_lang", None)
    if executor is None or patch_lang is None or not hasattr(interpreter, "_LangPatchScope"):
        return False
    if getattr(patch_lang, "reuses_launch_patch", False):  # installed already
        return True

    launches = []  # per launch in progress: the language modules its kernel sees, and whether patched yet

    def language_modules(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    def patch_once_per_launch(fn):
        if launches:
            launch = launches[-1]
            if launch["patched"] and language_modules(fn) <= launch["modules"]:
                return interpreter._LangPatchScope()  # nothing to restore
            launch["patched"] = True
        return patch_lang(fn)

    patch_once_per_launch.reuses_launch_patch = True
    run_launch = executor.__call__

    def launch(self, *args, **kwargs):
        launches.append({"modules": language_modules(self.fn), "patched": False})
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_once_per_launch
    executor.__call__ = launch
    return True
