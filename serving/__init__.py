"""Stage 3: a LitServe server over a bundle, and its HTTP client."""
