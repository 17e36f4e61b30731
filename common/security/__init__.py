"""CurveZMQ key files and socket setup shared by the controller, the agents and murakkabctl."""
