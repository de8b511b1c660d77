"""What the server knows of the traffic after a release: each process's window of recent answers (window), the main
process's live drift against the bundle's reference (drift), and the sampled payload log (payloads)."""
