"""The loss as a function: the one evaluation path (``functional``), the argument checks and their
messages (``validate``), and the moving-average rate's schedule (``schedule``)."""
