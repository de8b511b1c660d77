"""The HTTP protocol: the route table, the spec over the data plane, the request and response codec, the Guard in
front of the app, the {"error"} bodies, connections, and the OpenAPI document built from the route table."""
