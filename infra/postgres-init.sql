-- One PostgreSQL for the team: Prefect's database, MLflow's, and cul's own (the request queue
-- and the lineage locks, cul/io/database.py). Run once by the postgres image at first start.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE cul;
