"""Training: the loop, what differs per method (recipes), the train state, how a run stops."""
