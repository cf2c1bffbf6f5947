// Artillery processor for scenarios.yaml: appends the body of every 200
// response of GET /keys (one key) to $KGS_LOAD_KEYS_FILE, one per line, so
// scripts/load-test.sh can check that no key was handed out twice.
"use strict";
const fs = require("fs");

const file = process.env.KGS_LOAD_KEYS_FILE;

function recordKey(requestParams, response, context, ee, next) {
  if (file && response.statusCode === 200) {
    fs.appendFileSync(file, String(response.body).trim() + "\n");
  }
  return next();
}

module.exports = { recordKey };
