"""Input pipelines and video files (numpy, PyAV, Grain); nothing here imports the model."""
