-- operator_actions becomes the read model of the opsflow.operator-actions topic
-- (opsflow.operator_actions): an action is taken from the console by a signed-in user, or
-- from the opsflow command by an operator who is no console user (no user id, no role).
-- `via` says where it was taken, `principal` the Kafka principal its writes used.
ALTER TABLE operator_actions DROP CONSTRAINT operator_actions_user_id_fkey;
ALTER TABLE operator_actions ALTER COLUMN user_id DROP NOT NULL;
ALTER TABLE operator_actions ALTER COLUMN role DROP NOT NULL;
ALTER TABLE operator_actions ADD COLUMN via text NOT NULL DEFAULT 'console';
ALTER TABLE operator_actions ADD COLUMN principal text;
ALTER TABLE operator_actions ADD COLUMN host text;
