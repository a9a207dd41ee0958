"""Named trainer configs (`trainer fit --config NAME`)."""
