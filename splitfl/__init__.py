"""splitfl: split and federated training of medical imaging models over CKKS homomorphic encryption."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("splitfl")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
