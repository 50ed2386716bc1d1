"""The control socket: who may call (access), the socket file (socket) or
the one systemd passed (activation), one client (connection), the plugin
that serves it (server), and what an op is given and answers with
(requests)."""
