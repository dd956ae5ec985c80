"""Ground floor: errors and file writes that every other package may use. Imports no project package."""
