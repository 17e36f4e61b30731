"""Job execution: the pure DAG executor the controller daemon feeds with events."""
