// MQTT.js as an app would use it: connect, subscribe at QoS 1, print the first message, exit.
// node subscribe.mjs URL CLIENT_ID USERNAME TOKEN TOPIC
import mqtt from "mqtt";

const [url, clientId, username, password, topic] = process.argv.slice(2);
const client = mqtt.connect(url, { clientId, username, password, protocolVersion: 4, reconnectPeriod: 0 });
const fail = (why) => { console.error(why); process.exit(1); };
setTimeout(() => fail("no message in 30 s"), 30000).unref();
client.on("error", (error) => fail(`error: ${error.message}`));
client.on("connect", () => {
  client.subscribe(topic, { qos: 1 }, (error, granted) => {
    if (error || granted[0].qos !== 1) fail(`subscribe refused: ${error ?? JSON.stringify(granted)}`);
    console.log("SUBSCRIBED");
  });
});
client.on("message", (_topic, payload) => {
  console.log(payload.toString());
  client.end(false, () => process.exit(0));
});
