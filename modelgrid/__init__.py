"""ModelGrid client SDK. Imports without torch: the model code lives in modelgrid.model."""
