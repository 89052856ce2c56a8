"""``python -m splitfl`` is the ``splitfl`` command."""
from splitfl.cli import main

if __name__ == "__main__":
    main()
