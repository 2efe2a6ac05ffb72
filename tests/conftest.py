"""Test set-up: 8 virtual CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Datasets the tests build go to a fresh directory per test process, never the user's.
import tempfile  # noqa: E402

os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="embedspace_tfds_"))
