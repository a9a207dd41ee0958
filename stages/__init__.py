"""imagemill stages."""
