"""Model configuration: the dataclass -> CLI/YAML engine (`engine`) and the sections both roles share (`sections`)."""
