"""Hardware target profiles (TOML data) and the fit / roofline maths. Code asks a Target about capabilities
(`target.supports(precision=..., runtime=...)`), never about its name."""

from edgepack.targets.profile import Target, list_targets, load_target

__all__ = ["Target", "list_targets", "load_target"]
