// The smoke detector of golden/smoke.codec.json as an IoTDA JavaScript codec: byte 0 is the
// message type (0 report, 1 SET_ALARM, 2 its response), big-endian fields after it.
var REPORT = 0, COMMAND = 1, RESPONSE = 2;

function decode(payload, topic) {
    // IoTDA hands scripts Java bytes (-128..127).
    let bytes = [];
    for (var i = 0; i < payload.length; i++) {
        bytes.push(payload[i] & 0xFF);
    }
    if (bytes[0] === REPORT) {
        let temperature = (bytes[2] << 8) | bytes[3];
        if (temperature > 0x7FFF) {
            temperature -= 0x10000;
        }
        return JSON.stringify({
            msg_type: "properties_report",
            services: [{ service_id: "Smoke", properties: { level: bytes[1], temperature: temperature / 10 } }]
        });
    }
    if (bytes[0] === RESPONSE) {
        return JSON.stringify({
            msg_type: "command_response",
            mid: (bytes[1] << 8) | bytes[2],
            result_code: bytes[3],
            paras: { result: bytes[4] }
        });
    }
    throw new Error("unknown message type " + bytes[0] + (topic ? " on " + topic : ""));
}

function encode(json) {
    const command = JSON.parse(json);
    if (command.msg_type !== "commands" || command.command_name !== "SET_ALARM") {
        throw new Error("cannot encode " + command.command_name);
    }
    var mid = command.mid || 0;
    return [COMMAND, (mid >> 8) & 0xFF, mid & 0xFF, command.paras.value & 0xFF];
}
