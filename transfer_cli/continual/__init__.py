"""Class-incremental scenarios: a sequence of stages over one dataset's classes, each a fit of the one
training loop on that stage's classes, tested on every class seen so far (`scenario=class_incremental`)."""
