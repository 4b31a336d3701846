"""KFP pipelines of fcpts."""
