"""Benchmarks (``splitfl bench NAME``): each measures its variants side by side in one run and prints ratios.

They sit on top of the regimes they time; ``bench/*.py`` at the repository root are thin launchers.
"""
