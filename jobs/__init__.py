"""What producer and worker share, with no torch: settings, errors, the job
message schema, the Celery app and its routing, and S3 URI handling."""
