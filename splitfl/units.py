"""Human-readable units for tables and plots (bytes on the wire), shared by every report writer."""
from __future__ import annotations


def format_bytes(n: float | None) -> str:
    """``1.23 MB``-style text for a byte count; ``—`` when the count is unknown."""
    if n is None:
        return "—"
    if n == 0:
        return "0"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
