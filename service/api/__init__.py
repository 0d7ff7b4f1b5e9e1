"""HTTP routes, one module per resource; each delegates to a service object."""
