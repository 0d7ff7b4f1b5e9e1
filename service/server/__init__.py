"""The gateway process around the request path: settings, metrics, logging, the HTTP
protocol and the graceful drain."""
