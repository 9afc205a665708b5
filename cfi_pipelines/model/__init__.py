"""SQLAlchemy Core metadata of the three databases: CFI's source, the common
read cache, and MyCfia's campaigns."""
