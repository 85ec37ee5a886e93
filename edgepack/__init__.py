"""edgepack: from a Hugging Face checkpoint to a measured, device-specific bundle.

This module imports nothing heavy (no torch): `edgepack --help` and `import edgepack` stay fast.
"""

__version__ = "0.1.0"

from edgepack.artifact import Artifact, ArtifactWriter, open_artifact  # noqa: E402
from edgepack.errors import (  # noqa: E402
    ArtifactError,
    ConfigError,
    EdgepackError,
    MissingDependency,
    UnsupportedOnTarget,
    ValidationFailed,
)

__all__ = ["Artifact", "ArtifactWriter", "open_artifact", "EdgepackError", "ConfigError", "ArtifactError",
           "UnsupportedOnTarget", "ValidationFailed", "MissingDependency", "__version__"]
