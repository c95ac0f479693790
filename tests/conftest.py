import os

# Tests run on CPU in float32. Most of their time is XLA compiling small programs, so compile
# with LLVM's optimisations off (about 40% less test time; numerics stay within the golden
# tolerances). Subprocesses started by tests inherit both settings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
