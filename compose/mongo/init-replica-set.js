// mongo-init (docker-compose.yml): make the single mongod a one-member replica set (change
// streams and transactions need one), then wait until it is primary. Safe to run again.
try {
  rs.status();
  print("replica set rs0 already initiated");
} catch (e) {
  if (e.codeName !== "NotYetInitialized") throw e;
  rs.initiate({ _id: "rs0", members: [{ _id: 0, host: "mongo:27017" }] });
  print("replica set rs0 initiated");
}
for (let i = 0; i < 60; i++) {
  if (db.hello().isWritablePrimary) {
    print("rs0 primary ready");
    quit(0);
  }
  sleep(1000);
}
print("rs0 has no primary after 60 s");
quit(1);
