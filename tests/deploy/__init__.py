"""The deployment files, checked without Docker or Kubernetes (nothing is started)."""
