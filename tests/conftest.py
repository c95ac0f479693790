import os

# Tests run on CPU in float32; keep XLA from grabbing every core's worth of threads
# for tiny programs, and cache compiled programs between test processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
