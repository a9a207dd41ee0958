"""imagemill trainer."""
