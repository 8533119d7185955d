"""Training the seeds' architectures: data sources (:mod:`.data`), losses (:mod:`.losses`)
and the loop with validation, checkpoints and resume (:mod:`.loop`)."""
