"""Git over smart HTTP, answered from the mirrors, with a shared cache of pack responses."""
