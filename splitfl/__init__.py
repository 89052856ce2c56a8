"""splitfl."""
