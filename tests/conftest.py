"""Test-session setup: 8 simulated CPU devices (set before JAX is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests compile many small programs; XLA's full optimisation pipeline would dominate their time.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
