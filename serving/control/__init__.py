"""Which model versions the server holds and in which state: the model table, the controller that owns it, and each
API server's catalog of what it may route to."""
